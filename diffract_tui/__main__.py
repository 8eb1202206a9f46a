import sys

from diffract_tui.cli import main

sys.exit(main())
