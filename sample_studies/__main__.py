"""Allow ``python -m sample_studies`` as a shorthand for ``python -m sample_studies.generate``."""

import sys

from sample_studies.generate import main

sys.exit(main())
