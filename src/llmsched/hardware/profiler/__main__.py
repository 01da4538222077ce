"""``python -m llmsched.hardware.profiler``."""

import sys

from llmsched.hardware.profiler.command import main

sys.exit(main())
