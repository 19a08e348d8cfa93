"""``python -m rnnkit`` runs the CLI (and is what torchrun starts: ``torchrun ... -m rnnkit train``)."""

from rnnkit.cli import main
from rnnkit.runtime import exit_process

exit_process(main())
