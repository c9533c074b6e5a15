
#compdef parrot

_parrot_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _PARROT_COMPLETE=complete_zsh parrot)
}

compdef _parrot_completion parrot

