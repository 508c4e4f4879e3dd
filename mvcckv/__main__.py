import sys

from mvcckv.cli import main

sys.exit(main())
