
#compdef ddpm

_ddpm_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _DDPM_COMPLETE=complete_zsh ddpm)
}

compdef _ddpm_completion ddpm

