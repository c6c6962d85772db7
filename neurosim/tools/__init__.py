"""What users run: the command line (``cli``: ``neurosim run|evaluate|plot|compare``), the
figures of a run directory (``figures``) and studies that train several rules side by side
(``study``).

The top layer: may import every other part; nothing imports it.
"""
