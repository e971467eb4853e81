"""`python -m simplenet_fast ...` is the `simplenet-fast` command; torchrun starts it as
`torchrun --nproc-per-node N -m simplenet_fast score ...`."""
import sys

from .cli import main

sys.exit(main())
