"""Tools around the pipeline: speedrun, launch, doctor, report, bench."""
