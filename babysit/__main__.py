from __future__ import annotations

import sys

from babysit.cli import main

sys.exit(main())
