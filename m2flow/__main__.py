import sys

from m2flow.cli import main

sys.exit(main())
