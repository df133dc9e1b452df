"""Protocol files (YAML) of the label-generation work chains ``eqml.labels.*``."""
