"""The math of FIP, free of PEFT and of any model class: functional distances, the Kronecker-factored metric, the
output-space projection, sparsity scores and schedules, and the seeds of random draws. Each module derives what it
computes in its docstring. Modules here import only each other (and `fip_peft.choices`)."""
