"""``python -m llmsched.hardware.calibration``."""

import sys

from llmsched.hardware.calibration.command import main

sys.exit(main())
