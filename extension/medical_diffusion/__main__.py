from medical_diffusion.cli import main

raise SystemExit(main())
