import sys

from parallel_dkp.cli import main

sys.exit(main())
