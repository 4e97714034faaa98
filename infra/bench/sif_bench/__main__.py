from sif_bench.run import main

main()
