"""The self-consistent ML Hubbard loop (``eqml.hubbard.self_consistent``) and its parts."""
