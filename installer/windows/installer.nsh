; Garage's additions to electron-builder's NSIS installer (nsis.include in installer/electron-builder.yml).
; Only macros: electron-builder compiles the uninstaller from the same include, and a function one
; side does not use would be a warning, which electron-builder treats as an error.
;  - installer, after the files are copied: run check-prereqs.ps1 and show what it found;
;  - uninstaller, first: stop the Garage node that runs from this folder, so its files can go.

!include "LogicLib.nsh"
!include "x64.nsh"

; The last PowerShell run's exit code ("error" when it could not start). Not $0: the macros run
; inside electron-builder's own functions, which use the numbered registers.
Var garageExit

; 64-bit PowerShell from this 32-bit installer: with file system redirection off, $SYSDIR is the
; real System32 (else Get-CimInstance cannot read 64-bit processes' paths, and wsl.exe is missing).
!macro garagePowerShell COMMAND
  ${If} ${RunningX64}
    ${DisableX64FSRedirection}
  ${EndIf}
  nsExec::ExecToLog `"$SYSDIR\WindowsPowerShell\v1.0\powershell.exe" -NoProfile -NonInteractive -ExecutionPolicy Bypass ${COMMAND}`
  Pop $garageExit
  ${If} ${RunningX64}
    ${EnableX64FSRedirection}
  ${EndIf}
!macroend

!macro customInstall
  DetailPrint "Checking this PC for Garage (resources\check-prereqs.ps1)"
  !insertmacro garagePowerShell `-File "$INSTDIR\resources\check-prereqs.ps1"`
  ${If} $garageExit == 1
    MessageBox MB_OK|MB_ICONEXCLAMATION "Garage is installed, but this PC cannot run a Garage node yet.$\r$\n$\r$\nClick $\"Show details$\" to see what is missing and how to fix it. To check again later, run in PowerShell:$\r$\npowershell -ExecutionPolicy Bypass -File $\"$INSTDIR\resources\check-prereqs.ps1$\"" /SD IDOK
  ${ElseIf} $garageExit != 0
    DetailPrint "The prerequisite check could not run ($garageExit). Run garage doctor from $INSTDIR\garage.cmd later."
  ${EndIf}
!macroend

; The node the tray app started (node.exe from this folder, and its engine) keeps its files open.
; Matched by path, never by name alone: other Node programs on the PC are left alone. The folder
; goes to PowerShell in an environment variable, so no quote in a user name can break the command.
!macro customUnInit
  System::Call 'Kernel32::SetEnvironmentVariable(t "GARAGE_INSTDIR", t "$INSTDIR")'
  !insertmacro garagePowerShell `-Command "Get-CimInstance Win32_Process | Where-Object { $$_.Name -eq 'node.exe' -and $$_.ExecutablePath -and $$_.ExecutablePath.StartsWith($$env:GARAGE_INSTDIR + '\', 'OrdinalIgnoreCase') } | ForEach-Object { Stop-Process -Id $$_.ProcessId -Force -ErrorAction SilentlyContinue }"`
!macroend
