from prefalign.cli import main

raise SystemExit(main())
