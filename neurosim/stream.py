# bridge: removed by the layout change
from neurosim.data.stream import *  # noqa: F401,F403
