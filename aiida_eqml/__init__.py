"""aiida-eqml: symmetry-aware machine learning of materials properties inside AiiDA."""
__version__ = "0.1.0"
