from ext4box.cli import main

raise SystemExit(main())
