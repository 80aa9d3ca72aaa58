from batchctl.cli import main

raise SystemExit(main())
