import sys

from perceiver_music.cli import main

sys.exit(main())
