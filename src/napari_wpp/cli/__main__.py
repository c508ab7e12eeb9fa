"""``python -m napari_wpp.cli``: the command line."""

import sys

from napari_wpp.cli import main

sys.exit(main())
