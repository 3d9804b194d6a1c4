"""specdb: declarative experiment database for optimizer-induced spectral scaling.

This package must import without torch or ray (workers/ holds everything that trains).
"""

__version__ = "0.1.0"
