"""Calcfunctions of aiida-eqml (each module imports aiida; import the one you need)."""
