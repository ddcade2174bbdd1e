"""Training half: green nnU-Net trainers composed from a precision policy, an optimizer recipe and a meter."""
