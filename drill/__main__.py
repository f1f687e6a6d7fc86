from __future__ import annotations

import sys

from drill.cli import main

sys.exit(main())
