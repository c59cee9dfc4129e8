"""What runs on top of the library: the `fip-peft` command line and the evaluation loops and plots."""
