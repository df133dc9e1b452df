"""Command-line interfaces: ``aiida-eqml`` (main.py) and ``verdi data eqml`` (verdi_data.py)."""


def exception_text(exception: BaseException) -> str:
    """An exception's message for an error line, or its type when it has none (ASE's CIF reader raises a bare
    ``AssertionError`` on a file it cannot parse)."""
    return str(exception) or type(exception).__name__
