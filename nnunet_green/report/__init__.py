"""`nnunet-green-report`: tables and figures comparing green training runs and compressed models.

collect (inputs -> records) -> tables (cells + footnotes) -> plots (PNG) -> markdown / html / report.json.
"""
