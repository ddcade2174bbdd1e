import sys

from nnunet_green.demo.run import main

sys.exit(main())
