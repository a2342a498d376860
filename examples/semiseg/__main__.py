"""``python -m examples.semiseg ...`` = ``python -m examples.semiseg.train ...``."""
from .train import main

main()
