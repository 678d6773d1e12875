from gpuheal.cli import main

raise SystemExit(main())
