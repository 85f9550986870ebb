"""``python -m attnguide.cli``."""
from . import main

main()
