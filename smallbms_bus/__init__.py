"""smallbms-bus: a software smallBMS NG for Lithium NG (LiFePO4) battery banks."""

__version__ = "0.1.0"
