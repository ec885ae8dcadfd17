from meddino.cli import main

raise SystemExit(main())
