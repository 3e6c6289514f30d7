import sys

from dsv4train.cli.main import main

sys.exit(main())
