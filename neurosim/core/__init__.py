"""The circuit core: neuron populations, synapses and their kinds (dense, convolutional), feedback
pathways, the ``Circuit`` that wires them, the two executions (compiled: batched tensor ops; the
literal reference in ``reference``), angles between matrices (``analysis``) and batch norm over
processes (``sync_bn``).

May import ``neurosim.common`` and ``neurosim.rules`` (a synapse holds its rule), nothing above.
"""
