"""synthaug's version, in a leaf module so that any module can import it without the package root."""

__version__ = "0.1.0"
