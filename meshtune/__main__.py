from meshtune.cli import main

raise SystemExit(main())
