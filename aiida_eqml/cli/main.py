"""The ``aiida-eqml`` command line: a click group; each topic lives in its own module and is added here."""
from __future__ import annotations

import click

from .. import __version__
from .hubbard import hubbard
from .local import local
from .ml import predict, train


@click.group(context_settings={'help_option_names': ['-h', '--help']})
@click.version_option(__version__, prog_name='aiida-eqml')
def cli():
    """aiida-eqml: equivariant machine learning of materials properties, with labels from Quantum ESPRESSO."""


cli.add_command(local)
cli.add_command(hubbard)
cli.add_command(train)
cli.add_command(predict)

if __name__ == '__main__':
    cli()
