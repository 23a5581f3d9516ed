import sys

from cybertron.cli import main

sys.exit(main())
