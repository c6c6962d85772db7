"""What every other part may use: user errors (``errors``), files written whole or not at all
(``files``), and the console a command prints to (``console``).

Imports nothing of neurosim; PyTorch is not loaded here.
"""
