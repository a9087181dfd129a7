"""parallel_dkp: Direct Kolen-Pollack learning and its relatives, layer-parallel across ranks."""

__version__ = "0.1.0"
