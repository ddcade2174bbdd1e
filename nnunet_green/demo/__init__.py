"""End-to-end demo (`make demo`): data → plan → green training → compression → prediction → report."""
