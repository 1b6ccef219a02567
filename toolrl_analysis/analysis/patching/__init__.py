"""Cross-model activation patching at decision tokens (`run`): the trained model's greedy trajectories and
their position sets (`texts`), patching in three backends (`backends`), the grid (`measure`), recoveries with
intervals over environments (`summary`) and the heatmaps (`plots`)."""
