from kernel_profile.boot import main

main()
