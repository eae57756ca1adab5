from shard.server import main

main()
