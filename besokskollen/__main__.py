from besokskollen.cli import main

main()
