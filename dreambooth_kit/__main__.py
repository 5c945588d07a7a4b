from dreambooth_kit.cli import main

raise SystemExit(main())
