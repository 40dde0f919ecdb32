from zoomldm.cli.main import main

main()
