from weightlift.cli import main
import sys
sys.exit(main())
